"""What the train step uses: the models (models.py), a run's set-up: device, precision, optimizer,
schedule (setup.py), the data on the device (batches.py), batched augmentation (transforms.py),
checkpoints and model files (checkpoint.py), several devices through torchrun (ddp.py)."""
