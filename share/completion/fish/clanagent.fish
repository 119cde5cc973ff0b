# fish completion for clanagent; generated from its argparse parser by
# scripts/cli_docs.py: do not edit (make cli-docs).

function __clanagent_subs
    switch $argv[1]
        case 'clanagent'
            string split -- ' ' 'run keygen vm-image join'
    end
end

function __clanagent_valopts
    switch $argv[1]
        case 'clanagent run'
            string split -- ' ' '--config --state-dir --control-socket --listen --join --log-level'
        case 'clanagent keygen'
            string split -- ' ' '--state-dir'
        case 'clanagent join'
            string split -- ' ' '--config --state-dir'
    end
end

# The command the words typed so far name (subcommands only, options skipped).
function __clanagent_path
    set -l words (commandline -opc)
    set -l path clanagent
    set -l skip 0
    for w in $words[2..-1]
        if test $skip = 1
            set skip 0
            continue
        end
        switch $w
            case '-*'
                if contains -- $w (__clanagent_valopts "$path")
                    set skip 1
                end
            case '*'
                if contains -- $w (__clanagent_subs "$path")
                    set path "$path $w"
                end
        end
    end
    echo "$path"
end

function __clanagent_at
    test "$(__clanagent_path)" = "$argv[1]"
end

complete -c clanagent -f
complete -c clanagent -n '__clanagent_at \'clanagent\'' -a 'run' -d 'run the agent in the foreground (what systemd starts)'
complete -c clanagent -n '__clanagent_at \'clanagent\'' -a 'keygen' -d 'create this node\'s keys (run also does it on first start)'
complete -c clanagent -n '__clanagent_at \'clanagent\'' -a 'vm-image' -d 'build a minimal VM image (kernel + busybox initramfs)'
complete -c clanagent -n '__clanagent_at \'clanagent\'' -a 'join' -d 'make this machine a member of a clan (token from an admin)'
complete -c clanagent -n '__clanagent_at \'clanagent\'' -s h -l help -d 'show this help message and exit'
complete -c clanagent -n '__clanagent_at \'clanagent\'' -l version -d 'show program\'s version number and exit'
complete -c clanagent -n '__clanagent_at \'clanagent run\'' -s h -l help -d 'show this help message and exit'
complete -c clanagent -n '__clanagent_at \'clanagent run\'' -l config -r -F -d 'config file (default /etc/clanagent/agent.toml)'
complete -c clanagent -n '__clanagent_at \'clanagent run\'' -l state-dir -x -a '(__fish_complete_directories)' -d 'where keys and records live'
complete -c clanagent -n '__clanagent_at \'clanagent run\'' -l control-socket -r -F -d 'path of the control socket'
complete -c clanagent -n '__clanagent_at \'clanagent run\'' -l listen -x -d 'address for peer connections (default 0.0.0.0:7946; "" = do not listen)'
complete -c clanagent -n '__clanagent_at \'clanagent run\'' -l join -x -d 'seed peer address (repeatable)'
complete -c clanagent -n '__clanagent_at \'clanagent run\'' -l log-level -x -a 'debug info warning error' -d 'how much to log'
complete -c clanagent -n '__clanagent_at \'clanagent keygen\'' -s h -l help -d 'show this help message and exit'
complete -c clanagent -n '__clanagent_at \'clanagent keygen\'' -l state-dir -x -a '(__fish_complete_directories)' -d 'where the keys live'
complete -c clanagent -n '__clanagent_at \'clanagent vm-image\'' -s h -l help -d 'show this help message and exit'
complete -c clanagent -n '__clanagent_at \'clanagent vm-image\'' -a '(__fish_complete_directories)'
complete -c clanagent -n '__clanagent_at \'clanagent join\'' -s h -l help -d 'show this help message and exit'
complete -c clanagent -n '__clanagent_at \'clanagent join\'' -l config -r -F -d 'config file (default /etc/clanagent/agent.toml)'
complete -c clanagent -n '__clanagent_at \'clanagent join\'' -l state-dir -x -a '(__fish_complete_directories)' -d 'where keys and records live (default: state_dir of the config)'
