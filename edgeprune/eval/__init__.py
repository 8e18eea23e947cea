"""Task metrics. The metric math is numpy-only so runtimes on torch-free devices can reuse it."""
