"""Data: VQA v2 files (or the synthetic shapes set in the same layout) to training batches.

layout -> vqav2 / hub (split tables, checked records) -> answers (vocabulary, soft scores)
-> tokenizer -> datamodule (cached encodings, images, collate). ``shapes`` generates the
default data, ``check`` validates a data root. Nothing is imported here, so the command-line
tools (``python -m vqa.data.shapes``) start without loading torch.
"""
