"""A real `CLIPTokenizer` for the toy model, built offline from the data set's words.

CLIP's tokenizer is byte-pair encoding (BPE): a word starts as characters (the last one marked
with ``</w>``) and a ranked list of merges glues neighbours together. We write the merges
ourselves so that each caption word becomes exactly one token, as common English words do in
the real CLIP vocabulary.
"""
from __future__ import annotations

from transformers import CLIPTokenizer

from .data import COLOURS, POSITIONS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokenize one word with the merges so far (the same greedy rule the tokenizer uses)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tokenizer(words: list[str], model_max_length: int = 16) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds every character of `words` and each whole word.

    Merges are added word by word, always for the leftmost pair still apart, until the word is
    one token; a new merge never splits a word finished earlier, because that word has no pairs
    left. Unknown words fall back to characters, as in the real tokenizer.
    """
    chars = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    merges = [pair for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    for word in words:
        if len(tok.tokenize(word)) != 1:
            raise AssertionError(f"the toy tokenizer split {word!r} into {tok.tokenize(word)}")
    return tok


def caption_words() -> list[str]:
    """Every word the shapes captions use ("a small red circle in the top left"), sorted."""
    words = "a small large in the".split() + list(COLOURS) + list(SHAPES)
    words += [w for p in POSITIONS for w in p.split()]
    return sorted(set(words))
