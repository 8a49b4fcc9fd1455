//! Run configuration: a TOML file + flags + `--set` overrides -> one resolved struct.
