#!/usr/bin/env python3
"""Produce the MiniLM reference vectors used by the encoder parity test.

Run once, by hand (it needs torch + sentence-transformers, which CI does not install):
    python3 -m pip install sentence-transformers
    cascade fetch minilm --out data/minilm
    python3 scripts/make-minilm-fixture.py data/minilm > crates/cascade-model/tests/fixtures/minilm_reference.json
`data/minilm` holds the pinned all-MiniLM-L6-v2 files; sentence-transformers loads
the model from a directory with the same files (weights, tokenizer, config).
"""
import json
import sys
import tempfile
import shutil
import os

import sentence_transformers
from sentence_transformers import SentenceTransformer, models

SENTENCES = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War",
    "A quiet documentary about fishermen on a cold northern coast.",
    "Cascade ranks candidates with a multimodal neural ranker.",
]


def main(model_dir: str) -> None:
    # Rebuild the sentence-transformers pipeline explicitly from the pinned files:
    # BERT (max_seq_length 256) -> mean pooling -> L2 normalisation.
    with tempfile.TemporaryDirectory() as tmp:
        for f in ["model.safetensors", "tokenizer.json", "config.json"]:
            shutil.copy(os.path.join(model_dir, f), os.path.join(tmp, f))
        word = models.Transformer(tmp, max_seq_length=256)
        pool = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
        model = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
        vecs = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    json.dump(
        {
            "produced_by": (
                f"scripts/make-minilm-fixture.py with sentence-transformers "
                f"{sentence_transformers.__version__} on CPU: Transformer(max_seq_length=256) "
                "-> Pooling(mean) -> Normalize over the pinned all-MiniLM-L6-v2 files"
            ),
            "sentences": SENTENCES,
            "vectors": [[round(float(x), 7) for x in v] for v in vecs],
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main(sys.argv[1])
