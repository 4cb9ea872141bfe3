"""The embedded offline default data: generated deterministically, identical on every machine.

- Text: English-like sentences from a small probabilistic grammar (number agreement, adjective
  and preposition phrases, subordinate clauses). The structure is learnable, so MLM / CLM losses
  fall well below the unigram entropy within a few hundred steps on 2 CPU cores.
- Images: 10 classes of synthetic shapes (square, disc, ring, cross, horizontal / vertical /
  diagonal stripes, checkerboard, triangle, dots) of random size, position and brightness, brighter
  than a flat dark background, with pixel noise, as RGB uint8 arrays.

No file is shipped or downloaded: the same seed gives byte-identical data with numpy's PCG64.
"""

import numpy as np

_NAMES = ["anna", "boris", "clara", "david", "elena", "felix", "greta", "hugo", "iris", "jonas", "karin", "leo"]
_NOUNS = [
    ("farmer", "farmers"), ("river", "rivers"), ("teacher", "teachers"), ("city", "cities"), ("child", "children"),
    ("bird", "birds"), ("ship", "ships"), ("letter", "letters"), ("garden", "gardens"), ("engine", "engines"),
    ("mountain", "mountains"), ("king", "kings"), ("doctor", "doctors"), ("window", "windows"), ("horse", "horses"),
    ("student", "students"), ("forest", "forests"), ("bridge", "bridges"), ("painter", "painters"), ("book", "books"),
]  # fmt: skip
_VERBS = [
    ("sees", "see", "saw"), ("finds", "find", "found"), ("builds", "build", "built"), ("paints", "paint", "painted"),
    ("follows", "follow", "followed"), ("carries", "carry", "carried"), ("remembers", "remember", "remembered"),
    ("watches", "watch", "watched"), ("visits", "visit", "visited"), ("writes", "write", "wrote"),
]  # fmt: skip
_ADJECTIVES = ["old", "young", "small", "large", "quiet", "bright", "dark", "northern", "green", "famous", "tired"]
_PREPOSITIONS = ["near", "behind", "under", "beyond", "beside", "across"]
_NUMBERS = ["two", "three", "four", "five", "seven", "ten", "many", "several"]
_ADVERBS = ["slowly", "often", "never", "always", "quickly", "carefully"]
_CONJUNCTIONS = ["because", "while", "although", "when"]


def _noun_phrase(rng: np.random.Generator, plural: bool, depth: int = 0) -> list[str]:
    singular, plural_form = _NOUNS[rng.integers(len(_NOUNS))]
    words = [_NUMBERS[rng.integers(len(_NUMBERS))] if plural else ("the" if rng.random() < 0.7 else "a")]
    if rng.random() < 0.6:
        words.append(_ADJECTIVES[rng.integers(len(_ADJECTIVES))])
    words.append(plural_form if plural else singular)
    if depth == 0 and rng.random() < 0.35:
        words += [_PREPOSITIONS[rng.integers(len(_PREPOSITIONS))]] + _noun_phrase(rng, rng.random() < 0.4, depth + 1)
    return words


def _clause(rng: np.random.Generator) -> list[str]:
    plural = rng.random() < 0.4
    subject = [_NAMES[rng.integers(len(_NAMES))]] if rng.random() < 0.25 and not plural else _noun_phrase(rng, plural)
    present_s, present_p, past = _VERBS[rng.integers(len(_VERBS))]
    tense = rng.random()
    verb = past if tense < 0.4 else (present_p if plural else present_s)
    words = subject + ([_ADVERBS[rng.integers(len(_ADVERBS))]] if rng.random() < 0.3 else []) + [verb]
    return words + _noun_phrase(rng, rng.random() < 0.4)


def generate_sentence(rng: np.random.Generator) -> str:
    words = _clause(rng)
    if rng.random() < 0.3:
        words += [","] + [_CONJUNCTIONS[rng.integers(len(_CONJUNCTIONS))]] + _clause(rng)
    return " ".join(words) + " ."


def generate_corpus(num_lines: int, seed: int = 0) -> list[str]:
    """`num_lines` paragraphs of 1-4 generated sentences each."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [" ".join(generate_sentence(rng) for _ in range(rng.integers(1, 5))) for _ in range(num_lines)]


def generate_noop_corpus(num_lines: int, seed: int = 0, slots: int = 40, pair_probability: float = 0.2) -> list[str]:
    """Synthetic "background" text in which attention is mostly useless (the outlier-effect probe).

    Each line has `slots` slots: a background token `.` (probability 1 - `pair_probability`) or a
    pair `kN vM` where `vM` is a fixed random permutation of `kN` (50 keys). Only a masked member of
    a pair needs another token (its partner); every other token is best left unchanged by attention,
    which is the situation in which Bondarenko et al. see heads learn a no-op (attend to the
    delimiter) and the residual stream grow outliers.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    values = rng.permutation(50)
    lines = []
    for _ in range(num_lines):
        words = []
        for _ in range(slots):
            if rng.random() < pair_probability:
                key = int(rng.integers(50))
                words += [f"k{key}", f"v{values[key]}"]
            else:
                words.append(".")
        lines.append(" ".join(words))
    return lines


SHAPE_CLASSES = (
    "square", "disc", "ring", "cross", "h_stripes", "v_stripes", "diagonal", "checker", "triangle", "dots",
)  # fmt: skip


def _shape_mask(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    extent = int(rng.integers(size // 3, size * 3 // 4))
    top, left = (int(v) for v in rng.integers(0, size - extent + 1, size=2))
    yy, xx = np.mgrid[0:extent, 0:extent].astype(np.float32)
    c, r = (extent - 1) / 2, extent / 2
    dist = np.sqrt((yy - c) ** 2 + (xx - c) ** 2)
    period = max(2, extent // 4)
    local = {
        0: np.ones_like(yy, dtype=bool),
        1: dist <= r,
        2: (dist <= r) & (dist >= r * 0.55),
        3: (np.abs(yy - c) <= extent / 8) | (np.abs(xx - c) <= extent / 8),
        4: (yy // (period / 2)) % 2 == 0,
        5: (xx // (period / 2)) % 2 == 0,
        6: ((yy + xx) // (period / 2)) % 2 == 0,
        7: ((yy // period) + (xx // period)) % 2 == 0,
        8: xx <= yy,
        9: ((yy % period) < period / 2.5) & ((xx % period) < period / 2.5),
    }[label]
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + extent, left : left + extent] = local
    return mask


def generate_images(num_images: int, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images `[N, H, W, 3]` uint8 and labels `[N]` int64 (10 balanced shape classes)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    labels = np.arange(num_images) % len(SHAPE_CLASSES)
    rng.shuffle(labels)
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        background = rng.integers(0, 100) + rng.integers(0, 30, size=3)  # dark, slightly tinted
        foreground = background + rng.integers(100, 126)  # brighter: the shape always stands out
        mask = _shape_mask(int(label), image_size, rng)
        image = np.where(mask[..., None], foreground, background).astype(np.float32)
        image += rng.normal(0.0, 8.0, size=image.shape)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)
