import pytest
import torch
from transformers import CLIPTextModel

from conditioning import TextEncoder, TextEncoderConfig
from conditioning.token_rows import CaptionRowEmbedding

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 16}
CAPTIONS = ["a red circle", "a blue square"]


def trainable_encoder() -> TextEncoder:
    return TextEncoder.from_config(TextEncoderConfig(frozen=False, train_token_embedding=True, **SMALL))


def test_caption_rows_encode_as_the_full_table_before_training():
    encoder = trainable_encoder()
    before = encoder.encode(["a green triangle", *CAPTIONS]).detach()
    rows = encoder.train_caption_rows(CAPTIONS)
    assert rows == len({*encoder.tokenize([*CAPTIONS, ""]).input_ids.flatten().tolist()})
    torch.testing.assert_close(encoder.encode(["a green triangle", *CAPTIONS]), before, rtol=0, atol=0)


def test_only_the_caption_rows_train_and_merge_into_a_plain_clip(tmp_path):
    encoder = trainable_encoder()
    encoder.train_caption_rows(CAPTIONS)
    table = encoder.model.get_input_embeddings()
    assert isinstance(table, CaptionRowEmbedding)
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert [name for name in trainable if "token_embedding" in name] == [
        next(name for name in trainable if name.endswith("token_embedding.rows"))
    ]  # the rows train, the table's weight does not
    full_before = table.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    encoder.encode(CAPTIONS).square().mean().backward()
    optimizer.step()
    assert torch.equal(table.weight, full_before)  # the 49,408-row table is not touched
    merged = table.merged_weight()
    used = table.ids
    assert not torch.equal(merged[used], full_before[used])
    unused = torch.ones(merged.shape[0], dtype=torch.bool)
    unused[used] = False
    assert torch.equal(merged[unused], full_before[unused])

    encoder.save_pretrained(tmp_path)
    plain = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", use_safetensors=True)
    assert type(plain.get_input_embeddings()) is torch.nn.Embedding
    loaded = TextEncoder(plain, encoder.tokenizer, TextEncoderConfig(**SMALL))
    torch.testing.assert_close(loaded.encode(CAPTIONS), encoder.eval().encode(CAPTIONS).detach())


def test_caption_rows_refuse_ids_outside_the_table():
    with pytest.raises(ValueError, match="ids"):
        CaptionRowEmbedding(torch.nn.Embedding(10, 4), torch.tensor([3, 10]))


def test_an_image_folders_captions_are_read_from_its_metadata_without_decoding_an_image():
    from pathlib import Path

    from torch.utils.data import Dataset

    from ldm.training.batches import training_captions

    class Folder(Dataset):
        def __init__(self):
            self.records = [(Path("a.png"), "a red circle"), (Path("b.png"), ["a blue square", "a square, blue"])]

        def __len__(self):
            return len(self.records)

        def __getitem__(self, index):
            raise AssertionError("an image was decoded")

    assert training_captions(Folder()) == ["a blue square", "a red circle", "a square, blue"]  # every caption
