# fish completion for clanctl; generated from its argparse parser by
# scripts/cli_docs.py: do not edit (make cli-docs).

function __clanctl_subs
    switch $argv[1]
        case 'clanctl'
            string split -- ' ' 'status whoami peers events metrics clan machine invite machines inventory path ssh tor-connect services secrets vm ui'
        case 'clanctl clan'
            string split -- ' ' 'init'
        case 'clanctl machine'
            string split -- ' ' 'add'
        case 'clanctl inventory'
            string split -- ' ' 'show diff apply history conflicts'
        case 'clanctl secrets'
            string split -- ' ' 'list status show-public rotate'
        case 'clanctl vm'
            string split -- ' ' 'list logs console start stop restart'
    end
end

function __clanctl_valopts
    switch $argv[1]
        case 'clanctl'
            string split -- ' ' '--socket --timeout'
        case 'clanctl events'
            string split -- ' ' '--count'
        case 'clanctl clan init'
            string split -- ' ' '--admin-key --machine --tags --endpoint --out'
        case 'clanctl machine add'
            string split -- ' ' '--key --tags --endpoint --admin-key'
        case 'clanctl inventory apply'
            string split -- ' ' '--admin-key --message -m'
        case 'clanctl vm logs'
            string split -- ' ' '--timeout'
        case 'clanctl vm console'
            string split -- ' ' '--machine --admin-key --linger'
        case 'clanctl vm start'
            string split -- ' ' '--admin-key'
        case 'clanctl vm stop'
            string split -- ' ' '--admin-key'
        case 'clanctl vm restart'
            string split -- ' ' '--admin-key'
        case 'clanctl ui'
            string split -- ' ' '--admin-key'
    end
end

# The command the words typed so far name (subcommands only, options skipped).
function __clanctl_path
    set -l words (commandline -opc)
    set -l path clanctl
    set -l skip 0
    for w in $words[2..-1]
        if test $skip = 1
            set skip 0
            continue
        end
        switch $w
            case '-*'
                if contains -- $w (__clanctl_valopts "$path")
                    set skip 1
                end
            case '*'
                if contains -- $w (__clanctl_subs "$path")
                    set path "$path $w"
                end
        end
    end
    echo "$path"
end

function __clanctl_at
    test "$(__clanctl_path)" = "$argv[1]"
end

complete -c clanctl -f
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'status' -d 'node, uptime and what this machine can do'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'whoami' -d 'this node\'s identity and public keys'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'peers' -d 'members of the clan and their state'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'events' -d 'stream agent events until interrupted'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'metrics' -d 'Prometheus metrics of this agent (what /metrics serves)'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'clan' -d 'found a clan'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'machine' -d 'add machines'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'invite' -d 'print a join token for a machine of the inventory'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'machines' -d 'machines of the clan: tags, state, services, VMs'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'inventory' -d 'show, diff and apply the clan\'s inventory'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'path' -d 'the chosen path to a machine, and the ranked alternatives'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'ssh' -d 'ssh to a machine over the best path'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'tor-connect' -d '(used by `clanctl ssh` as its ProxyCommand to reach onion hosts)'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'services' -d 'service instances, roles, machines and their wiring'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'secrets' -d 'the clan\'s secrets (never their values)'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'vm' -d 'the clan\'s micro VMs'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -a 'ui' -d 'start the web console and print a one-time login URL'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -l version -d 'show program\'s version number and exit'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -l socket -r -F -d 'control socket (default $CLANAGENT_SOCKET or /run/clanagent/control.sock)'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl\'' -l timeout -x -d 'seconds to wait for the agent (default 10)'
complete -c clanctl -n '__clanctl_at \'clanctl status\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl status\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl whoami\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl whoami\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl peers\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl peers\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl events\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl events\'' -l count -x -d 'stop after N events'
complete -c clanctl -n '__clanctl_at \'clanctl events\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl metrics\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl metrics\'' -l openmetrics -d 'OpenMetrics text format'
complete -c clanctl -n '__clanctl_at \'clanctl metrics\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl clan\'' -a 'init' -d 'found a clan with this machine as its first member'
complete -c clanctl -n '__clanctl_at \'clanctl clan\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl clan\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl clan init\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl clan init\'' -l admin-key -r -F -d 'admin key file, created if missing (default $CLANAGENT_ADMIN_KEY or ~/.config/clanagent/admin.key)'
complete -c clanctl -n '__clanctl_at \'clanctl clan init\'' -l machine -x -d 'this machine\'s name in the inventory (default: host name)'
complete -c clanctl -n '__clanctl_at \'clanctl clan init\'' -l tags -x -d 'comma-separated tags'
complete -c clanctl -n '__clanctl_at \'clanctl clan init\'' -l endpoint -x -d 'public HOST:PORT'
complete -c clanctl -n '__clanctl_at \'clanctl clan init\'' -l out -r -F -d 'also write the inventory TOML to this file'
complete -c clanctl -n '__clanctl_at \'clanctl clan init\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl machine\'' -a 'add' -d 'add a machine and print its join token'
complete -c clanctl -n '__clanctl_at \'clanctl machine\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl machine\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl machine add\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl machine add\'' -l key -x -d 'the \'machine key\' that clanagent keygen printed'
complete -c clanctl -n '__clanctl_at \'clanctl machine add\'' -l tags -x -d 'comma-separated tags'
complete -c clanctl -n '__clanctl_at \'clanctl machine add\'' -l endpoint -x -d 'public HOST:PORT'
complete -c clanctl -n '__clanctl_at \'clanctl machine add\'' -l admin-key -r -F -d 'admin key file (repeat for several)'
complete -c clanctl -n '__clanctl_at \'clanctl machine add\'' -l yes -d 'do not ask'
complete -c clanctl -n '__clanctl_at \'clanctl machine add\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl invite\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl invite\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl machines\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl machines\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl inventory\'' -a 'show' -d 'the effective inventory as TOML'
complete -c clanctl -n '__clanctl_at \'clanctl inventory\'' -a 'diff' -d 'what applying FILE would change'
complete -c clanctl -n '__clanctl_at \'clanctl inventory\'' -a 'apply' -d 'validate, diff, sign and submit FILE'
complete -c clanctl -n '__clanctl_at \'clanctl inventory\'' -a 'history' -d 'accepted versions, newest first'
complete -c clanctl -n '__clanctl_at \'clanctl inventory\'' -a 'conflicts' -d 'entries concurrent edits changed differently'
complete -c clanctl -n '__clanctl_at \'clanctl inventory\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl inventory\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl inventory show\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl inventory show\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl inventory diff\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl inventory diff\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl inventory diff\'' -F
complete -c clanctl -n '__clanctl_at \'clanctl inventory apply\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl inventory apply\'' -l admin-key -r -F -d 'admin key file (repeat for several)'
complete -c clanctl -n '__clanctl_at \'clanctl inventory apply\'' -l message -s m -x -d 'a note kept in the history'
complete -c clanctl -n '__clanctl_at \'clanctl inventory apply\'' -l yes -d 'do not ask'
complete -c clanctl -n '__clanctl_at \'clanctl inventory apply\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl inventory apply\'' -F
complete -c clanctl -n '__clanctl_at \'clanctl inventory history\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl inventory history\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl inventory conflicts\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl inventory conflicts\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl path\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl path\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl ssh\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl ssh\'' -l print -d 'print the ssh command instead'
complete -c clanctl -n '__clanctl_at \'clanctl ssh\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl tor-connect\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl tor-connect\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl services\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl services\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl secrets\'' -a 'list' -d 'every secret instance'
complete -c clanctl -n '__clanctl_at \'clanctl secrets\'' -a 'status' -d 'age, next rotation, recipients, who holds it'
complete -c clanctl -n '__clanctl_at \'clanctl secrets\'' -a 'show-public' -d 'the public part of a secret'
complete -c clanctl -n '__clanctl_at \'clanctl secrets\'' -a 'rotate' -d 'make a new generation now'
complete -c clanctl -n '__clanctl_at \'clanctl secrets\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl secrets\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl secrets list\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl secrets list\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl secrets status\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl secrets status\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl secrets show-public\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl secrets show-public\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl secrets rotate\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl secrets rotate\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl vm\'' -a 'list' -d 'every VM, where it runs, its state and accelerator'
complete -c clanctl -n '__clanctl_at \'clanctl vm\'' -a 'logs' -d 'a VM\'s console log, from any machine'
complete -c clanctl -n '__clanctl_at \'clanctl vm\'' -a 'console' -d 'an interactive serial console of a VM, from any machine (admins only)'
complete -c clanctl -n '__clanctl_at \'clanctl vm\'' -a 'start' -d 'start a VM an admin stopped (admins only; from any machine)'
complete -c clanctl -n '__clanctl_at \'clanctl vm\'' -a 'stop' -d 'stop a VM (it stays stopped until started) (admins only; from any machine)'
complete -c clanctl -n '__clanctl_at \'clanctl vm\'' -a 'restart' -d 'restart a VM (admins only; from any machine)'
complete -c clanctl -n '__clanctl_at \'clanctl vm\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl vm\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl vm list\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl vm list\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl vm logs\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl vm logs\'' -s f -l follow -d 'keep printing new output'
complete -c clanctl -n '__clanctl_at \'clanctl vm logs\'' -l timeout -x -d 'seconds to wait for the host'
complete -c clanctl -n '__clanctl_at \'clanctl vm logs\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl vm console\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl vm console\'' -l machine -x -d 'the host, when the VM is placed on several'
complete -c clanctl -n '__clanctl_at \'clanctl vm console\'' -l admin-key -r -F -d 'admin key file (default $CLANAGENT_ADMIN_KEY)'
complete -c clanctl -n '__clanctl_at \'clanctl vm console\'' -l linger -x -d 'with stdin not a terminal: seconds of quiet output before exiting (default 1)'
complete -c clanctl -n '__clanctl_at \'clanctl vm console\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl vm start\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl vm start\'' -l admin-key -r -F -d 'admin key file (default $CLANAGENT_ADMIN_KEY)'
complete -c clanctl -n '__clanctl_at \'clanctl vm start\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl vm stop\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl vm stop\'' -l admin-key -r -F -d 'admin key file (default $CLANAGENT_ADMIN_KEY)'
complete -c clanctl -n '__clanctl_at \'clanctl vm stop\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl vm restart\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl vm restart\'' -l admin-key -r -F -d 'admin key file (default $CLANAGENT_ADMIN_KEY)'
complete -c clanctl -n '__clanctl_at \'clanctl vm restart\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
complete -c clanctl -n '__clanctl_at \'clanctl ui\'' -s h -l help -d 'show this help message and exit'
complete -c clanctl -n '__clanctl_at \'clanctl ui\'' -l open -d 'also open it in the default browser'
complete -c clanctl -n '__clanctl_at \'clanctl ui\'' -l admin-key -r -F -d 'admin key file the console may sign with (default $CLANAGENT_ADMIN_KEY or ~/.config/clanagent/admin.key, when it exists); the agent reads it itself'
complete -c clanctl -n '__clanctl_at \'clanctl ui\'' -l json -d 'print JSON for scripts (before or after the command; stdout is then only JSON)'
