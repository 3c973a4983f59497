"""On-device LoRA/QLoRA training: a torch-free parent side (spec, runner, memory planning) and
a worker child process (model, loop, checkpoints) that imports torch."""
