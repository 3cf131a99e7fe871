"""The data layer: records, formats, readers and encoding. Imports torch, transformers and datasets
(lazily), never the trainer, the model or the command line."""
from metarm_fast.data.encode import EncodedSeq, Encoder, collate, hh_to_messages, messages_to_hh
from metarm_fast.data.formats import PAIR_FORMATS, RANKED_FORMATS, detect
from metarm_fast.data.readers import load_meta, load_pairs, load_prompts, read_records
from metarm_fast.data.records import DataError, LoadReport, MetaGroup, PreferencePair, RankedGroup

__all__ = [
    "read_records",
    "DataError",
    "EncodedSeq",
    "Encoder",
    "LoadReport",
    "MetaGroup",
    "PAIR_FORMATS",
    "PreferencePair",
    "RANKED_FORMATS",
    "RankedGroup",
    "collate",
    "detect",
    "hh_to_messages",
    "load_meta",
    "load_pairs",
    "load_prompts",
    "messages_to_hh",
]
