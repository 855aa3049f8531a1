"""Train the bundled debug tokenizer (``builtin:debug``) on CPython's pydoc topics.

Debug models and tests need a real tokenizer with a chat template that works offline and
is small enough to ship in the wheel. Byte-level BPE never fails on unseen text, and the
pydoc corpus ships with every Python, so rerunning this script reproduces the asset::

    python scripts/build_debug_tokenizer.py            # writes mtp_recipes/assets/debug_tokenizer/
"""

from __future__ import annotations

import argparse
from pathlib import Path
from pydoc_data.topics import topics

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 4096
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
# ChatML: the assistant's turn ends with <|im_end|>, which the model must learn to emit.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "mtp_recipes" / "assets" / "debug_tokenizer"


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train byte-level BPE on the pydoc topics, in their sorted (deterministic) order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Same corpus and order as the `builtin:pydoc` source (kept standalone: no package import).
    tokenizer.train_from_iterator([topics[key] for key in sorted(topics)], trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(args.vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(args.out)
    print(f"wrote {args.out} (vocab {len(wrapped)})")


if __name__ == "__main__":
    main()
