"""The adapter library: a SQLite registry plus content-addressed safetensors blobs.

``Library`` is the entry point; ``AdapterRecord`` is one registry row.
"""

from loramix.store.blobs import BlobStore
from loramix.store.bulk import NewAdapter
from loramix.store.peft_io import read_blob, read_peft_dir, validate_weights, write_peft_dir
from loramix.store.records import AdapterRecord
from loramix.store.registry import Library

__all__ = ["AdapterRecord", "BlobStore", "Library", "NewAdapter", "read_blob", "read_peft_dir", "validate_weights", "write_peft_dir"]
