"""The text side: the CLIP tokenizer and text encoder that condition the U-Net."""
