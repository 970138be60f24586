"""The app's wing: its settings and presets, the compute thread, and the figures (no gradio here)."""
