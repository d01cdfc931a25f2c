"""`dalle imagine`: the codes optimised for CLIP's score, with our CLIP and with a Hugging Face one."""

import json

import torch
from PIL import Image

from dalle.cli import main
from dalle.images import tensor_to_pil
from dalle.inference.imagine import differentiable_image_embedding, imagine
from dalle.inference.pipeline import load_pipeline, load_scorer
from dalle.models.dvae import decode

from .test_rerank import save_tiny_hf_clip


def test_the_clip_score_rises_and_the_picture_is_made_of_codes(tiny_pipeline):
    pipeline = load_pipeline(tiny_pipeline, device="cpu")
    scores = []
    found = imagine(pipeline.dvae, pipeline.scorer, "a red circle", steps=40, seed=0, lr=0.3, progress=False,
                    on_step=lambda step, score: scores.append(score))
    assert len(scores) == 40 and max(scores[-10:]) > scores[0]
    assert found.image.size == (32, 32) and found.codes.shape == (pipeline.grid**2,)
    decoded = decode(pipeline.dvae, found.codes.view(1, pipeline.grid, pipeline.grid))[0]  # made of those codes
    assert tensor_to_pil(decoded).tobytes() == found.image.tobytes()
    assert all(p.requires_grad for p in pipeline.dvae.parameters())  # the weights were not left frozen


def test_a_hugging_face_clip_judges_with_gradients(tiny_pipeline, tmp_path):
    save_tiny_hf_clip(tmp_path / "hf")
    scorer = load_scorer(f"hf:{tmp_path / 'hf'}")
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    embedding = differentiable_image_embedding(scorer, images)
    embedding.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    want = scorer.embed_images([Image.fromarray((images[0].detach().permute(1, 2, 0) * 255).round().byte().numpy())])
    assert torch.nn.functional.cosine_similarity(embedding[:1].detach(), want).item() > 0.95  # the processor's view


def test_dalle_imagine_writes_the_contract_files(tiny_pipeline, tmp_path):
    save_tiny_hf_clip(tmp_path / "hf")
    for name, extra in (("ours", ["--frames"]), ("hf", ["--clip", f"hf:{tmp_path / 'hf'}", "--init", "sample"])):
        out = tmp_path / name
        assert main(["imagine", "--model", str(tiny_pipeline), "--prompt", "a red circle", "--seed", "3",
                     "--steps", "10", "--out", str(out), "--device", "cpu", *extra]) == 0
        (line,) = [json.loads(text) for text in (out / "samples.jsonl").read_text().splitlines()]
        assert line["rank"] == 1 and line["seed"] == 3 and isinstance(line["clip_score"], float)
        assert Image.open(out / line["image"]).size == (32, 32)
        if name == "ours":
            assert Image.open(out / line["frames"]).n_frames >= 2
