"""A tiny T5 tokenizer (SentencePiece Unigram), trained offline on a built-in corpus, for SD3/Flux test fixtures.

Real T5 tokenizers (SD3's tokenizer_3, Flux's tokenizer_2) hold 32,000 SentencePiece pieces; this one holds
`vocab_size` pieces trained with the `tokenizers` library's UnigramTrainer, laid out as T5's: <pad>=0,
</s>=1, <unk>=2, the trained pieces, then <extra_id_99> ... <extra_id_0> at the end (transformers'
T5Converter), with the backend pipeline transformers 5's T5Tokenizer builds (WhitespaceSplit + Metaspace
"▁" prepended always, `$A </s>` post-processing, Metaspace decoder). Real T5 folders also carry a
SentencePiece `Precompiled` nmt_nfkc charsmap normalizer; making one needs SentencePiece, so this fixture
has no normalizer (transformers rebuilds the backend on load and keeps only a Precompiled normalizer anyway).

`save_tiny_t5_tokenizer(path)` writes the same files on every call, in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
EXTRA_IDS = 100
SCORE_DECIMALS = 2
MODEL_MAX_LENGTH = 512  # as SD3's tokenizer_3 and Flux's tokenizer_2 configs give it

CORPUS = """\
a photo of an astronaut riding a horse on mars
A painting of a fox sitting in a field at sunrise, oil on canvas, highly detailed
portrait of a young woman with red hair, soft lighting, 85mm lens, bokeh
a cat wearing sunglasses on the beach, digital art, trending on artstation
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump?
A futuristic city skyline at night with neon lights and flying cars
an old wooden house in the forest, covered in snow, winter evening
close-up photograph of a dew drop on a green leaf, macro, 4k, 8k, HDR
cinematic still of a knight in shining armor standing before a dragon
Watercolor illustration of a small village by the sea; boats in the harbor
A bowl of fresh fruit: apples, oranges, bananas, grapes and strawberries.
isometric view of a cozy bedroom with plants, books and a sleeping dog
a robot playing chess with an old man in a park, afternoon light
Mountains reflected in a calm lake at dawn, National Geographic photo
The year 2024 had 366 days; 12 months, 52 weeks and 8,784 hours.
Call 555-0123 or visit room 42B before 10:30 a.m. on 3/14/2025.
Prices went from $19.99 to €24.50 (a 22.6% rise) in 1 year.
café, naïve, résumé, crème brûlée, piñata, façade, jalapeño, Ångström, Zürich
São Paulo, München, Kraków, Reykjavík, Malmö, Besançon, Córdoba, Dvořák
"Hello," she said. "Isn't it wonderful?" He replied: 'Yes -- truly!'
Question? Answer! Ellipsis... semicolon; colon: dash - slash / backslash \\ pipe |
brackets (round) [square] {curly} <angle> and quotes "double" 'single'
email me at someone@example.com or see https://example.org/path?q=1&x=2
hash #tag, at @user, caret ^, tilde ~, underscore _, plus + equals = star *
UPPERCASE WORDS AND MiXeD CaSe Text Also Appear In Prompts SOMETIMES
masterpiece, best quality, ultra detailed, 8k wallpaper, sharp focus
(masterpiece:1.2), [blurry], {beautiful}, ((intricate details))
a steampunk airship above Victorian London, brass gears and copper pipes
minimalist logo of a mountain and the sun, flat vector, white background
an anime girl with blue eyes and long silver hair, studio lighting
A dog and a cat are friends. They play together every day in the garden.
Three apples, two pears, one lemon; zero bananas and 100 cherries.
the first, second, third, fourth, fifth, sixth, seventh, eighth, ninth, tenth
one two three four five six seven eight nine ten eleven twelve twenty hundred thousand
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April
red orange yellow green blue indigo violet purple pink brown black white gray gold silver
north south east west left right up down inside outside above below behind between
happy sad angry calm excited tired curious brave gentle quiet loud bright dark
water fire earth air light shadow stone metal glass wood paper cloth silk leather
the children were running, jumping and laughing while their parents watched
It's a beautiful day; we're going out, they've left, I'm here, you'll see, he'd know.
Don't stop! Can't wait. Won't go. Shouldn't we? Wouldn't they? Isn't it?
a sculpture made of ice and crystal, glowing from within, dramatic shadows
vintage poster for a jazz festival in New Orleans, 1950s style typography
A map of an imaginary island with rivers, forests, castles and a volcano
underwater scene with coral reefs, colorful fish, sea turtles and sunlight rays
A spaceship landing on an alien planet with two moons and purple grass
The Eiffel Tower in Paris, the Colosseum in Rome, the Great Wall of China
élève, garçon, hôpital, forêt, être, déjà vu, naïveté, coöperate, Noël
Ich möchte ein Stück Kuchen. Schöne Grüße aus Köln! Straße, Fuß, Mädchen
¿Dónde está la biblioteca? ¡Qué bonito día! Mañana será otro día.
numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 100 256 512 1024 2048 3.14159 2.71828
version v1.5 sd3 flux.1 dev schnell t5 xxl clip vit-l/14 bigG 77 tokens
temperature 21°C, speed 60 km/h, weight 3.5 kg, ratio 16:9, resolution 1024x1024
a highly detailed render of a mechanical watch, unreal engine, octane render
A serene Japanese garden with a red bridge, koi pond and cherry blossoms
The old lighthouse stood alone on the cliff, its light sweeping across the waves.
She opened the letter slowly, smiled, and put it back into the envelope.
In the beginning there was darkness, and then there was light, color and sound.
"""


def training_texts() -> list[str]:
    """The corpus, one text per line, repeated once lower-cased so both casings get pieces."""
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    return lines + [line.lower() for line in lines]


def train_tiny_t5_backend(vocab_size: int = 1000):
    """A `tokenizers.Tokenizer` laid out and wired as transformers' T5 tokenizer, trained on CORPUS.

    vocab_size is the trainer's target; CORPUS holds material for about 700 pieces, so larger targets stop
    there (the sentinels come on top)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import Unigram

    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainee = Tokenizer(Unigram())
    trainee.pre_tokenizer = pre_tokenizer
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], unk_token=UNK, shrinking_factor=0.75,
        max_piece_length=16, n_sub_iterations=2, show_progress=False,
    )
    trainee.train_from_iterator(training_texts(), trainer=trainer)
    trained_vocab = [tuple(item) for item in json.loads(trainee.to_str())["model"]["vocab"]]
    specials, trained = trained_vocab[:3], trained_vocab[3:]
    assert [piece for piece, _ in specials] == [PAD, EOS, UNK], specials
    # The trainer's scores vary run to run (it sums in hash-map order, and its lone-character pieces get
    # scores 1e-4 apart in that order): rounded to 0.01 and sorted, the files come out the same every time.
    trained = sorted(((piece, round(score, SCORE_DECIMALS)) for piece, score in trained), key=lambda p: (-p[1], p[0]))
    pieces = specials + trained
    # T5Converter.vocab: the sentinels follow the SentencePiece pieces, <extra_id_99> first.
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]

    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", EOS], pair=["$A", EOS, "$B", EOS], special_tokens=[(EOS, 1)],
    )
    return tokenizer


def save_tiny_t5_tokenizer(path, vocab_size: int = 1000) -> Path:
    """Train the tiny T5 tokenizer and save it as transformers' T5TokenizerFast does (tokenizer.json,
    tokenizer_config.json); `T5TokenizerFast.from_pretrained(path)` loads it. Returns the folder."""
    from transformers import T5TokenizerFast

    folder = Path(path)
    wrapped = T5TokenizerFast(
        tokenizer_object=train_tiny_t5_backend(vocab_size), eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_ids=EXTRA_IDS, model_max_length=MODEL_MAX_LENGTH,
    )
    wrapped.save_pretrained(str(folder))
    return folder

