"""Adapter state dicts and files: the native format, the PEFT format both ways, merged-model exports."""
