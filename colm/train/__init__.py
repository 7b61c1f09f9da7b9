"""Training of CoLM / CoLM-Air models: data, losses, freezing, LoRA, FSDP2 and the loop.

``python -m colm.train --config FILE.yaml`` (also under ``torchrun``) and ``colm train`` run
``colm.train.loop.train``.
"""
