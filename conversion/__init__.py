"""Converters from other xLSTM checkpoint formats to xlstm_hf."""
