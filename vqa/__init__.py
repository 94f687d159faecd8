"""coattn-vqa: Visual Question Answering with pluggable co-attention fusion."""
