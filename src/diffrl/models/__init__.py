"""TRL's ``trl.models`` paths that user code imports, backed by diffrl's own components."""
