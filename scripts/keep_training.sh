#!/usr/bin/env bash
# Run a training command until it ends for good, running it again each time it was preempted.
#
#   scripts/keep_training.sh python -u train.py model=pythia28 datasets=[hh] loss=dpo resume_from=auto
#
# train.py exits 75 (EX_TEMPFAIL) after SIGTERM, SIGUSR1 or a first Ctrl-C, once it has written a
# checkpoint; with resume_from=auto the same command then continues from that checkpoint. Any
# other exit code (0 done, 2 a setting or file to fix, 3 a non-finite step) is passed on as it is.
# On one machine train.py starts its own ranks and passes 75 on; torchrun turns a worker's 75
# into its own failure code, so under torchrun use scripts/slurm_requeue.sbatch's pattern instead.
#
# KEEP_TRAINING_MAX_RUNS (default 100) bounds the runs, so that a job preempted at every start
# cannot loop for ever.
set -u
if [ "$#" -eq 0 ]; then
    echo "usage: $0 <command> [args...]   (e.g. python -u train.py ... resume_from=auto)" >&2
    exit 2
fi
case " $* " in
    *" resume_from=auto "*) ;;
    *) echo "note: without resume_from=auto each run would start from scratch; add it to continue" >&2 ;;
esac
max_runs=${KEEP_TRAINING_MAX_RUNS:-100}
run=1
while true; do
    "$@"
    code=$?
    if [ "$code" -ne 75 ]; then
        exit "$code"
    fi
    if [ "$run" -ge "$max_runs" ]; then
        echo "keep_training: preempted $run times, the limit (KEEP_TRAINING_MAX_RUNS); stopping with 75" >&2
        exit 75
    fi
    run=$((run + 1))
    echo "keep_training: preempted (exit 75); run $run continues from its checkpoint" >&2
done
