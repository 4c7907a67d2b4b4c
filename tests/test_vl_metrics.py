"""VQA accuracy and answer normalisation, CIDEr-D, and the VL-T5 annotation loaders, targets and batches of
``leantune.tasks.vl``, on known examples worked out by hand and hand-made JSON files."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers as hf

import leantune
from leantune.errors import ConfigError
from leantune.tasks.core import DataError
from leantune.tasks.vl import load_vl_task, paper_batch_sizes
from leantune.tasks.vl_metrics import (
    cider_d,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    tokenize_caption,
    vqa_accuracy,
)
from leantune.vl import VisionLanguageModel


# --- VQA normalisation and accuracy -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("yes.", "yes"),            # a final period goes
    ("3.5", "3.5"),             # a decimal point stays
    ("1,000", "1000"),          # a comma between digits: marks are deleted, not spaced
    ("t-shirt", "t shirt"),     # a mark touching no space becomes a space
    ("red, white", "red white"),  # a mark touching a space is deleted
    ("what?!", "what  "),       # neither mark touches a space: each becomes one
])
def test_punctuation_step(text: str, expected: str) -> None:
    assert process_punctuation(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Two dogs", "2 dogs"), ("none", "0"), ("the red car", "red car"), ("an apple a day", "apple day"),
    ("dont know", "don't know"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("Im here", "im here"),  # the official I-forms are capitalised and never match a lower-cased answer
])
def test_digit_article_contraction_step(text: str, expected: str) -> None:
    assert process_digit_article(text) == expected


def test_normalize_answer_runs_both_steps() -> None:
    assert normalize_answer("  The Two\tcats. ") == "2 cats"


@pytest.mark.parametrize("prediction,answers,expected", [
    ("yes", ["yes"] * 10, 1.0),
    # "two" -> "2": leaving out one of the three "2"s leaves 2 matches (2/3), else 3 matches (1): (3*2/3 + 7)/10
    ("two", ["2"] * 3 + ["3"] * 7, (3 * 2 / 3 + 7 * 1) / 10),
    # one "dog": leaving it out leaves 0 matches, every other subset 1 match: 9 * (1/3) / 10
    ("the dog", ["dog"] + ["cat"] * 9, 9 * (1 / 3) / 10),
    # the contraction is restored on the prediction: 2 matching answers -> (2 * 1/3 + 8 * 2/3) / 10
    ("Dont know", ["don't know"] * 2 + ["no"] * 8, (2 / 3 + 8 * 2 / 3) / 10),
    # unanimous answers get no punctuation step, the prediction does: "t-shirt" -> "t shirt" matches nothing
    ("t-shirt", ["t-shirt"] * 10, 0.0),
    # disagreeing answers get the punctuation step: nine "t shirt"s match in every subset
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0),
])
def test_vqa_accuracy_on_hand_worked_examples(prediction: str, answers: list, expected: float) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


# --- CIDEr-D ------------------------------------------------------------------------------------------------------
def test_caption_tokenizer_drops_punctuation_like_ptb() -> None:
    assert tokenize_caption('A dog\'s "red" ball, (3.5 kg)... Isn\'t it?') == \
        ["a", "dog", "'s", "red", "ball", "3.5", "kg", "is", "n't", "it"]


def test_cider_d_on_a_two_image_example_worked_by_hand() -> None:
    # Unigrams only (n=1). Two images, so each weight is tf * (ln 2 - ln df). "a" is in both images' references:
    # weight 0; "cat", "dog", "bird" (df 1) and the unseen "the" (df 0 -> ln 1) weigh ln 2.
    # Image A "a cat" vs "a cat": cosine 1; vs "a dog": 0 -> 10 * (1 + 0) / 2 = 5. Same bigram count: no penalty.
    # Image B "the bird" vs "a bird": (ln2 * ln2) / (sqrt(2) ln2 * ln2) = 1/sqrt(2) -> 10 / sqrt(2).
    score, per_image = cider_d({"A": "A cat.", "B": "The bird"}, {"A": ["a cat", "A dog!"], "B": ["a bird"]}, n=1)
    assert per_image["A"] == pytest.approx(5.0)
    assert per_image["B"] == pytest.approx(10 / math.sqrt(2))
    assert score == pytest.approx((5.0 + 10 / math.sqrt(2)) / 2)


def test_cider_d_length_penalty_counts_bigrams() -> None:
    # n=2. "a cat sat" has 2 bigrams, its reference "a cat" 1: the penalty exp(-1 / (2 * 6^2)) applies.
    # Two images; every n-gram of image x is in no other image's references, so each weighs ln 2 (df 1 or 0).
    # Unigrams: hyp {a, cat, sat}, ref {a, cat}: cosine 2 / (sqrt 3 sqrt 2). Bigrams: hyp {a cat, cat sat},
    # ref {a cat}: cosine 1 / sqrt 2. Image y ("b" vs "b"): unigram cosine 1, no bigrams: 10 * (1 + 0) / 2.
    _, per_image = cider_d({"x": "a cat sat", "y": "b"}, {"x": ["a cat"], "y": ["b"]}, n=2)
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 2 * math.exp(-1 / 72)
    assert per_image["x"] == pytest.approx(expected)
    assert per_image["y"] == pytest.approx(5.0)


def test_cider_d_matches_coco_caption_when_installed() -> None:
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = random.Random(0)
    words = "a man dog cat sitting on the red bench near water two people riding horse".split()
    refs = {i: [" ".join(rng.choices(words, k=rng.randint(4, 11))) for _ in range(5)] for i in range(20)}
    candidates = {i: " ".join(rng.choices(words, k=rng.randint(3, 12))) for i in range(20)}
    expected, expected_per_image = cider.Cider().compute_score(refs, {k: [v] for k, v in candidates.items()})
    score, per_image = cider_d(candidates, refs, tokenize=False)
    assert score == pytest.approx(expected)
    assert [per_image[i] for i in range(20)] == pytest.approx(list(expected_per_image))


def test_cider_d_refuses_mismatched_ids() -> None:
    with pytest.raises(ConfigError, match="same image ids"):
        cider_d({"a": "x"}, {"b": ["x"]})


# --- loaders ------------------------------------------------------------------------------------------------------
def write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def question(qid: int, image: str, text: str, label: dict, **extra) -> dict:
    return {"question_id": qid, "img_id": image, "sent": text, "label": label, **extra}


@pytest.fixture()
def vl_data(tmp_path: Path) -> Path:
    vqa = tmp_path / "vqa"
    write(vqa / "karpathy_train.json", [question(1, "COCO_1", "what color?", {"red": 1.0, "blue": 0.3}),
                                        question(2, "COCO_2", "how many?", {})])  # no answer: dropped
    write(vqa / "karpathy_val.json", [question(3, "COCO_3", "is it?", {"yes": 1.0},
                                               answers=[{"answer": "yes"}] * 9 + [{"answer": "no"}])])
    write(vqa / "karpathy_test.json", [question(4, "COCO_4", "what sport?", {"tennis": 1.0})])
    write(vqa / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 4, "answers": [{"answer": "tennis"}] * 2 + [{"answer": "golf"}] * 8}]})
    gqa = tmp_path / "gqa"
    write(gqa / "train.json", [question("g1", "101", "what is on the wall?", {"pipe": 1.0})])
    write(gqa / "valid.json", [question("g2", "102", "which side?", {"left": 1.0})])
    write(gqa / "testdev.json", [question("g3", "103", "is it red?", {"no": 1.0})])
    nlvr = tmp_path / "nlvr"
    for split, label in (("train", 1), ("valid", 0), ("test", 1)):
        write(nlvr / f"{split}.json", [{"identifier": f"{split}-1-0-0", "img0": f"{split}-1-0-img0",
                                        "img1": f"{split}-1-0-img1", "sent": "There are two dogs.",
                                        "label": label, "uid": f"nlvr2_{split}_0"}])
    images = [{"filename": f"COCO_val2014_{i}.jpg", "split": split,
               "sentences": [{"raw": f"caption {i} {j} "} for j in range(2)]}
              for i, split in enumerate(["train", "restval", "val", "test"])]
    write(tmp_path / "coco" / "dataset_coco.json", {"images": images})
    return tmp_path


def test_vqa_loader_draws_targets_by_score_and_reads_the_annotators_answers(vl_data: Path) -> None:
    task = load_vl_task(vl_data / "vqa")
    assert task.kind == "vqa" and task.spec.metric == "vqa_accuracy"
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    train = task.splits["train"][0]
    assert (train.text, train.inputs["visual_features"], train.task) == ("what color?", "COCO_1", "vqa")
    assert task.record(task.splits["validation"][0]).references == ("yes",) * 9 + ("no",)
    assert task.record(task.splits["test"][0]).references == ("tennis",) * 2 + ("golf",) * 8
    torch.manual_seed(0)
    draws = [task.draw_target(train.label) for _ in range(2000)]
    assert {w for a, w in draws if a == "red"} == {1.0} and {w for a, w in draws if a == "blue"} == {0.3}
    assert sum(a == "red" for a, _ in draws) / 2000 == pytest.approx(1.0 / 1.3, abs=0.03)
    # test: two "tennis" annotators -> (2 * 1/3 + 8 * 2/3) / 10 for "tennis"; validation: "yes" -> 1.0
    assert task.score(["Tennis"], [task.splits["test"][0].label]) == pytest.approx((2 / 3 + 16 / 3) / 10)
    assert task.score(["yes"], [task.splits["validation"][0].label]) == 1.0


def test_gqa_trains_on_train_and_valid_and_scores_exact_match(vl_data: Path) -> None:
    task = load_vl_task(vl_data / "gqa", prefix="gqa: ")
    assert task.kind == "gqa"
    assert [task.record(e).id for e in task.splits["train"]] == ["g1", "g2"]
    assert task.record(task.splits["validation"][0]).id == task.record(task.splits["test"][0]).id == "g3"
    assert task.draw_target(task.splits["train"][0].label) == ("pipe", 1.0)
    assert task.source_text(task.splits["train"][0]) == "gqa: what is on the wall?"
    labels = [task.splits["test"][0].label] * 2
    assert task.score(["no", "No"], labels) == 0.5


def test_nlvr_has_two_images_and_true_or_false(vl_data: Path) -> None:
    task = load_vl_task(vl_data / "nlvr")
    assert task.kind == "nlvr"
    train, valid = task.splits["train"][0], task.splits["validation"][0]
    assert train.inputs["visual_features"] == ("train-1-0-img0", "train-1-0-img1")
    assert task.target_text(train.label) == "true" and task.target_text(valid.label) == "false"
    assert task.score(["false", "true"], [valid.label, valid.label]) == 0.5


def test_coco_captions_one_example_per_caption_in_training(vl_data: Path) -> None:
    task = load_vl_task(vl_data / "coco")
    assert task.kind == "caption"
    assert len(task.splits["train"]) == 4  # train + restval images, two captions each
    assert {task.target_text(e.label) for e in task.splits["train"]} == {f"caption {i} {j}" for i in (0, 1)
                                                                         for j in (0, 1)}
    test = task.splits["test"][0]
    assert test.text is None and test.inputs["visual_features"] == "COCO_val2014_3"
    assert task.record(test).references == ("caption 3 0", "caption 3 1")
    assert task.score(["caption 3 0"], [test.label]) == pytest.approx(
        cider_d({0: "caption 3 0"}, {0: ["caption 3 0", "caption 3 1"]})[0])


def test_bad_annotation_files_are_named(tmp_path: Path) -> None:
    write(tmp_path / "karpathy_train.json", [{"img_id": "x", "sent": "q", "label": {}}])
    with pytest.raises(DataError, match=r"karpathy_train.json entry 0: no 'question_id'"):
        load_vl_task(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a VL-T5 annotation folder"):
        load_vl_task(tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown vision-and-language task kind 'vqa2'"):
        load_vl_task(tmp_path, kind="vqa2")


def test_paper_batch_sizes() -> None:
    assert paper_batch_sizes(500) == {"vqa": 500, "gqa": 833, "nlvr": 166, "caption": 416}
    assert paper_batch_sizes(300) == {"vqa": 300, "gqa": 500, "nlvr": 100, "caption": 250}


# --- batches and predictions --------------------------------------------------------------------------------------
FEATURES = {name: torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(
    ["COCO_1", "COCO_3", "COCO_4", "101", "102", "103", "COCO_val2014_0", "COCO_val2014_1", "COCO_val2014_2",
     "COCO_val2014_3"] + [f"{s}-1-0-img{k}" for s in ("train", "valid", "test") for k in (0, 1)])}


def lookup(name: str, values: list):
    """An input processor: image id(s) -> features, as a FeatureStore does."""
    rows = [torch.stack([FEATURES[i] for i in v]) if isinstance(v, tuple) else FEATURES[v] for v in values]
    return torch.stack(rows)


def byte_t5() -> tuple[VisionLanguageModel, hf.ByT5Tokenizer]:
    torch.manual_seed(0)
    t5 = hf.T5ForConditionalGeneration(hf.T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=2, num_heads=4,
                                                   d_kv=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return VisionLanguageModel(t5, feature_dim=8), hf.ByT5Tokenizer()


def test_text_to_text_batches_weight_vqa_and_predict_nlvr_by_logits(vl_data: Path) -> None:
    model, tokenizer = byte_t5()
    tuned = leantune.wrap(model, leantune.make_config("adapter", zero_init_up=False))
    vqa = load_vl_task(vl_data / "vqa", prefix="vqa: ")
    encoder = vqa.encoder_for_model(tokenizer, tuned, input_processor=lookup)
    torch.manual_seed(1)
    batch = encoder.batch(vqa.splits["train"] * 4)
    answers = tokenizer.batch_decode(batch["labels"].clamp(min=0), skip_special_tokens=True)
    assert set(answers) <= {"red", "blue"}
    assert batch["loss_weights"].tolist() == [1.0 if a == "red" else pytest.approx(0.3) for a in answers]
    assert batch["visual_features"].shape == (4, 3, 8)
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "vqa: what color?"
    assert tuned(**batch).loss.isfinite()
    nlvr = load_vl_task(vl_data / "nlvr")
    nlvr_encoder = nlvr.encoder_for_model(tokenizer, tuned, input_processor=lookup)
    inputs = nlvr_encoder.inputs(nlvr.splits["test"])
    assert inputs["visual_features"].shape == (1, 2, 3, 8)
    with torch.no_grad():
        predicted = nlvr_encoder.predictions(tuned.eval(), inputs)
        logits = tuned(**inputs, decoder_input_ids=torch.tensor([[0]])).logits[0, 0]
    true_id, false_id = tokenizer(text_target=["true", "false"])["input_ids"][0][0], ord("f") + 3
    assert predicted == ["true" if logits[true_id] > logits[false_id] else "false"]
    assert "loss_weights" not in nlvr_encoder.inputs(nlvr.splits["train"])
    assert nlvr_encoder.batch(nlvr.splits["train"])["loss_weights"].tolist() == [1.0]


def test_caption_predictions_use_beam_search(vl_data: Path) -> None:
    model, tokenizer = byte_t5()
    task = load_vl_task(vl_data / "coco")
    encoder = task.encoder_for_model(tokenizer, model.eval(), input_processor=lookup, max_target_length=6)
    inputs = encoder.inputs(task.splits["test"])
    assert "loss_weights" not in encoder.batch(task.splits["train"])
    with torch.no_grad():
        beams = model.generate(**inputs, max_new_tokens=6, num_beams=5, do_sample=False)
        predicted = encoder.predictions(model, inputs)
    assert predicted == [tokenizer.decode(beams[0], skip_special_tokens=True).strip()]


def test_an_encoder_only_model_classifies_over_the_answer_vocabulary(vl_data: Path) -> None:
    vqa = load_vl_task(vl_data / "vqa")
    assert vqa.label_names == ["blue", "red"]
    torch.manual_seed(0)
    bert = hf.BertModel(hf.BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64))
    model = VisionLanguageModel(bert, feature_dim=8, num_answers=2)
    encoder = vqa.encoder_for_model(hf.ByT5Tokenizer(), model, input_processor=lookup)
    batch = encoder.batch(vqa.splits["train"])
    assert batch["labels"].tolist() == [[pytest.approx(0.3), 1.0]]
    with torch.no_grad():
        logits = model(**encoder.inputs(vqa.splits["train"])).logits
        assert encoder.predictions(model, encoder.inputs(vqa.splits["train"])) == [vqa.label_names[logits.argmax()]]
    assert model(**batch).loss.isfinite()
