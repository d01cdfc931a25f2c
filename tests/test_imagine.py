"""`dalle imagine`: the codes optimised for CLIP's score, with our CLIP, a Hugging Face one, and the judge."""

import json
import shutil

import pytest
import torch
from PIL import Image

from dalle.cli import main
from dalle.errors import DalleError
from dalle.images import tensor_to_pil
from dalle.inference.imagine import differentiable_image_embedding, imagine, total_variation
from dalle.inference.pipeline import load_pipeline
from dalle.inference.scorers import load_scorer
from dalle.inference.scoring import CLIPScorer, score_images
from dalle.models.clip import load_clip
from dalle.models.dvae import decode

from .conftest import TINY
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


def test_restarts_run_together_and_the_ranker_keeps_the_best(tiny_pipeline):
    pipeline = load_pipeline(tiny_pipeline, device="cpu")
    ranker = CLIPScorer(load_clip(tiny_pipeline / "clip"), pipeline.tokenizer)
    torch.nn.init.normal_(ranker.model.image_projection.weight)  # a ranker that disagrees with the guide
    starts = torch.randint(0, pipeline.dvae.codebook_size, (3, pipeline.grid**2))
    found = imagine(pipeline.dvae, pipeline.scorer, "a red circle", steps=4, seed=0, restarts=3, ranker=ranker,
                    init_codes=starts, frame_every=2, progress=False)
    pictures = [tensor_to_pil(decode(pipeline.dvae, codes.view(1, pipeline.grid, pipeline.grid))[0])
                for codes in found.candidates]
    ranked = score_images(ranker, "a red circle", pictures)
    assert len(pictures) == 3 and found.image.tobytes() == pictures[int(ranked.argmax())].tobytes()
    assert [p.tobytes() for p in found.candidate_images] == [p.tobytes() for p in pictures]
    assert abs(found.rank_score - float(ranked.max())) < 1e-3
    assert abs(found.clip_score - float(score_images(pipeline.scorer, "a red circle", [found.image])[0])) < 1e-3
    assert found.frames[-1] is found.image and len(found.frames) == 3  # steps 0 and 2, then the result
    with pytest.raises(DalleError, match="restarts"):
        imagine(pipeline.dvae, pipeline.scorer, "a red circle", steps=1, restarts=0, progress=False)
    with pytest.raises(DalleError, match="2 starts for 3 restarts"):
        imagine(pipeline.dvae, pipeline.scorer, "a red circle", steps=1, restarts=3, init_codes=starts[:2],
                progress=False)


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


def test_total_variation_is_zero_for_a_flat_picture_and_two_for_a_checkerboard():
    assert total_variation(torch.full((1, 3, 8, 8), 0.3)).item() == 0.0
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float().expand(1, 3, 8, 8)
    assert abs(total_variation(board).item() - 2.0) < 1e-6


def test_the_judge_trains_on_pictures_that_fool_it_and_imagine_uses_it(tiny_pipeline, tmp_path, capsys):
    run = tmp_path / "model"
    shutil.copytree(tiny_pipeline, run)
    train_judge = ["train-judge", "--config", str(TINY), "--run-dir", str(run), "--set", "train.judge.batch_size=8",
                   "--set", "train.judge.warmup_steps=1"]
    attack = ["--set", "judge.eps=2.0", "--set", "judge.shape_twins=true", "--set", "judge.final_eps=1.0",
              "--set", "judge.final_steps=1",
              "--set", 'train.judge.mixed_precision="no"']  # bf16 rounds a tiny model's loss gap away
    assert main(train_judge + attack + ["--set", "train.judge.steps=4", "--set", "train.judge.log_every=1"]) == 0
    records = [json.loads(line) for line in (run / "logs" / "judge.jsonl").read_text().splitlines()]
    assert [r["eps"] for r in records] == [2.0, 2.0, 2.0, 1.0]  # the last update attacks within final_eps
    assert all(r["adversarial"] > r["clean"] for r in records)  # the attack found worse pictures
    judge, clip = load_clip(run / "judge"), load_clip(run / "clip")
    assert any(not torch.equal(a, b) for a, b in zip(judge.state_dict().values(), clip.state_dict().values()))
    out = tmp_path / "imagined"
    assert main(["imagine", "--model", str(run), "--prompt", "a red circle", "--steps", "5", "--out", str(out),
                 "--device", "cpu", "--restarts", "3"]) == 0
    (line,) = [json.loads(text) for text in (out / "samples.jsonl").read_text().splitlines()]
    picture = Image.open(out / line["image"])
    pipeline = load_pipeline(run, device="cpu")
    by_judge = score_images(CLIPScorer(judge, pipeline.tokenizer), "a red circle", [picture])[0]
    by_clip = score_images(pipeline.scorer, "a red circle", [picture])[0]
    assert abs(line["clip_score"] - float(by_judge)) < 1e-3 < abs(line["clip_score"] - float(by_clip))
    assert abs(line["rank_score"] - float(by_clip)) < 1e-3  # the CLIP chose among the restarts

    saved = pipeline.save_pretrained(tmp_path / "saved")  # save_pretrained and push_to_hub carry the judge
    assert all(torch.equal(a, b) for a, b in zip(load_clip(saved / "judge").state_dict().values(),
                                                 judge.state_dict().values()))
    assert load_pipeline(saved, device="cpu").judge is not None

    longer = train_judge + ["--set", "train.judge.steps=5"]
    assert main(longer + ["--set", "judge.eps=1.0"]) != 0  # a resumed judge must keep its attack
    assert "judge.eps = 2.0, now 1.0" in capsys.readouterr().err
    (state,) = (run / "train-state" / "judge").glob("step-*/state.json")
    written = json.loads(state.read_text())
    del written["settings"]["stage"]["judge.final_steps"]  # as a state written before the setting existed
    state.write_text(json.dumps(written))
    assert main(longer + attack) == 0  # resumes: only the settings the state recorded are compared


def test_imagine_refuses_a_negative_smoothness(tiny_pipeline):
    pipeline = load_pipeline(tiny_pipeline, device="cpu")
    with pytest.raises(DalleError, match="smoothness"):
        imagine(pipeline.dvae, pipeline.scorer, "a red circle", steps=1, smoothness=-1.0, progress=False)


def test_a_run_without_a_transformer_imagines_and_says_why_it_cannot_sample(tiny_pipeline, tmp_path, capsys):
    run = tmp_path / "model"
    shutil.copytree(tiny_pipeline, run, ignore=shutil.ignore_patterns("transformer"))  # dVAE + CLIP only
    out = tmp_path / "imagined"
    assert main(["imagine", "--model", str(run), "--prompt", "a red circle", "--steps", "3", "--out", str(out),
                 "--device", "cpu"]) == 0
    (line,) = [json.loads(text) for text in (out / "samples.jsonl").read_text().splitlines()]
    pipeline = load_pipeline(run, device="cpu")
    assert pipeline.transformer is None and pipeline.tokenizer.text_len == pipeline.scorer.model.config.text_len
    assert abs(line["clip_score"] - float(score_images(pipeline.scorer, "a red circle",
                                                      [Image.open(out / line["image"])])[0])) < 1e-3
    for command in (["generate", "--model", str(run), "--prompt", "a red circle", "--out", str(tmp_path / "g")],
                    ["imagine", "--model", str(run), "--prompt", "a red circle", "--steps", "3", "--init", "sample",
                     "--out", str(tmp_path / "s")]):
        assert main(command + ["--device", "cpu"]) != 0
        assert "has no transformer/, so it cannot sample: it only imagines" in capsys.readouterr().err
    shutil.rmtree(run / "clip")
    with pytest.raises(DalleError, match="transformer is missing"):  # no CLIP, no transformer: not a pipeline
        load_pipeline(run, device="cpu")
