r"""Runs a continual fine-tuning experiment.

  python -m experiments.run --config=experiments/configs/class_il.py \
      --workdir=runs/class_il [--config.method=finetune ...]

Everything reusable lives in `dlcft_jax`; `experiments/train.py` holds the
task loop. A configuration or data error ends the run with one message saying
what to change, exit status 2 (set DLCFT_TRACEBACK=1 to see the traceback
instead). Config files are Python: `--config=FILE` runs FILE as code, so pass
only files you trust.
"""

from experiments import cli, train


def main() -> None:
    cli.main(
        train.train_and_evaluate,
        config_help='A config file under experiments/configs/.',
        workdir_help='Folder for results.json and logs.',
    )


if __name__ == '__main__':
    main()
