"""The exit codes of run_ablation.py, in one place (the CLI, workers and launchers all return them).

0    every cell is done
1    some cell failed (each failed cell is named with its reason)
2    bad input: a malformed experiments file, an impossible variant, a missing dataset, an unusable store
75   preempted: SIGTERM/SIGUSR1 stopped the grid after checkpointing the running cell; run again to resume
     (75 is EX_TEMPFAIL of sysexits.h: "temporary failure, try again later")
124  the --time-limit was reached: cells not started or checkpointed mid-way; run the same command again
     (124 is what coreutils' `timeout` returns when the limit struck)
130  interrupted (Ctrl-C): the running cell is marked KILLED and runs again next time
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75
EXIT_TIME_LIMIT = 124
EXIT_INTERRUPTED = 130
