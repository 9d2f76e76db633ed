"""Pure tensor math (imports torch only): quantization, masks, schedules, size accounting."""
