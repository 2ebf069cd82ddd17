"""The DLRM application: YAML config, model building, planning and training commands."""
