"""`python -m cnn_pipeline <command> ...`: the `cnn-pipeline` command where the script is not on
PATH (torchrun's DDP ranks start train this way)."""

from cnn_pipeline.cli import main

main()
