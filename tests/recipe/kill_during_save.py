"""examples/pretrain_gdn.py, killed in the middle of writing one checkpoint (test_resume.py).

    python tests/recipe/kill_during_save.py KILL_ITERATION <pretrain_gdn.py arguments>

When the checkpoint of KILL_ITERATION is being written, the process writes it, cuts its largest
shard file in half (the bytes a kill mid-write leaves) and dies with os._exit(137) (no cleanup,
like SIGKILL), before megatron.training updates latest_checkpointed_iteration.txt.
"""

import multiprocessing
import os
import sys


def main():
    kill_at = int(sys.argv[1])
    from qla_megatron.training.compat import enable_megatron_training_on_cpu

    enable_megatron_training_on_cpu()
    import megatron.core.dist_checkpointing as dist_checkpointing

    real_save = dist_checkpointing.save

    def save(state_dict, checkpoint_dir, *args, **kwargs):
        out = real_save(state_dict, checkpoint_dir, *args, **kwargs)
        if os.path.basename(os.path.normpath(str(checkpoint_dir))) == f"iter_{kill_at:07d}":
            shards = [os.path.join(checkpoint_dir, f) for f in os.listdir(checkpoint_dir) if f.endswith(".distcp")]
            biggest = max(shards, key=os.path.getsize)
            with open(biggest, "r+b") as f:
                f.truncate(os.path.getsize(biggest) // 2)
            print(f"killed while saving iteration {kill_at}", flush=True)
            # A kill takes the whole process tree: dist-checkpointing's writer processes too.
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(137)
        return out

    dist_checkpointing.save = save
    from qla_megatron.training.launch import main as recipe_main

    return recipe_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
