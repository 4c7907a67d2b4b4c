"""Vision-and-language metrics: the official VQA accuracy with its answer normalisation, and CIDEr-D.

VQA (GT-Vision-Lab's ``vqaEval.py``, as VL-T5's ``evaluate_raw`` runs it): the prediction is normalised
(punctuation, number words, articles, contractions); the ten annotator answers get the punctuation step only, and
only when they disagree. The accuracy of one question is the mean, over the ten leave-one-annotator-out subsets,
of ``min(#matches / 3, 1)``.

CIDEr-D (Vedantam et al. 2015, as coco-caption's ``Cider`` scorer computes it, written here in Python): TF-IDF
n-gram vectors (n = 1..4, document frequencies over the references of the whole set), clipped cosine
similarity, a Gaussian length penalty (sigma 6), averaged over n and the references, times 10. Like coco-caption
it measures a caption's length by its number of bigrams. Captions are tokenised by :func:`tokenize_caption`, a
Python stand-in for the Stanford PTB tokenizer coco-caption calls through Java.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from leantune.errors import ConfigError

# --- VQA answer normalisation ------------------------------------------------------------------------------------
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as the official pattern: a period not followed by a digit
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The written forms of the official contraction table; each maps from every spelling with one apostrophe left out
# ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've"). The capitalised I-forms never match a
# lower-cased answer, as in the official table.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've"
).split()


def _contractions() -> dict[str, str]:
    table = {}
    for written in _CONTRACTED:
        positions = [i for i, c in enumerate(written) if c == "'"]
        for i in positions:
            table[written[:i] + written[i + 1:]] = written
    return table


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """The official punctuation step: each mark is deleted where it touches a space (or the text has a comma
    between digits), else replaced by a space; then periods not followed by a digit are deleted."""
    out = text
    glued = _DIGIT_COMMA.search(text) is not None
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if glued or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """Lower-case; number words to digits; articles dropped; contractions given their apostrophes."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer against the annotators' answers (ten in VQA v2)."""
    if not answers:
        raise ConfigError("vqa_accuracy needs the annotators' answers; got none")
    predicted = normalize_answer(prediction)
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    total = 0.0
    for left_out in range(len(answers)):
        matches = sum(1 for i, a in enumerate(answers) if i != left_out and a == predicted)
        total += min(1.0, matches / 3)
    return total / len(answers)


# --- CIDEr-D ----------------------------------------------------------------------------------------------------
# Tokens coco-caption's PTB tokenizer removes after tokenising (brackets become -LRB- etc. and go too).
_DROPPED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', "(", ")", "[", "]",
                      "{", "}"})
_CLITIC = re.compile(r"'(s|re|ve|ll|d|m)\b")
_NOT = re.compile(r"(\w)n't\b")
_SPLIT = re.compile(r"""([?!:;"()\[\]{}`]|(?<!\d)[.,]|[.,](?!\d))""")


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased PTB-style tokens without punctuation: ``"A dog's ball, red."`` -> ``a dog 's ball red``."""
    text = _NOT.sub(r"\1 n't", text.lower())
    text = _CLITIC.sub(r" '\1", text)
    return [t for t in _SPLIT.sub(r" \1 ", text).split() if t not in _DROPPED]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], n: int = 4,
            sigma: float = 6.0, tokenize: bool = True) -> tuple[float, dict[Hashable, float]]:
    """``(corpus CIDEr-D, per-image scores)`` of one candidate caption per image against its references.

    Scores are on coco-caption's scale (the papers' "CIDEr 112.9" is 1.129 here times 100). With ``tokenize=False``
    the captions are split on spaces as given (already tokenised).
    """
    if set(candidates) != set(references):
        missing = sorted(map(str, set(references) ^ set(candidates)))[:5]
        raise ConfigError(f"cider_d: candidates and references must have the same image ids; differing: {missing}")
    if any(not refs for refs in references.values()):
        raise ConfigError("cider_d: every image needs at least one reference caption")
    split = tokenize_caption if tokenize else str.split
    cand = {k: _ngrams(split(c), n) for k, c in candidates.items()}
    refs = {k: [_ngrams(split(r), n) for r in rs] for k, rs in references.items()}
    document_frequency: Counter = Counter()
    for counts in refs.values():
        document_frequency.update(set().union(*counts))
    log_images = math.log(len(refs)) if refs else 0.0

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        weights: list[dict] = [{} for _ in range(n)]
        norms = [0.0] * n
        for gram, tf in counts.items():
            weight = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
            weights[len(gram) - 1][gram] = weight
            norms[len(gram) - 1] += weight * weight
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return weights, [math.sqrt(v) for v in norms], bigrams

    scores = {}
    for key in references:
        hyp, hyp_norm, hyp_len = vector(cand[key])
        total = 0.0
        for ref_counts in refs[key]:
            ref, ref_norm, ref_len = vector(ref_counts)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                value = sum(min(w, ref[k].get(g, 0.0)) * ref[k].get(g, 0.0) for g, w in hyp[k].items())
                if hyp_norm[k] and ref_norm[k]:
                    value /= hyp_norm[k] * ref_norm[k]
                total += value * penalty / n
        scores[key] = 10.0 * total / len(refs[key])
    return (sum(scores.values()) / len(scores) if scores else 0.0), scores
