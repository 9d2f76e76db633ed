"""Pure tensor math (torch and the standard library only): quantization, masks, schedules, size accounting,
k-means, packing, GPTQ and SmoothQuant solvers, distillation losses, and the argument checks every entry point
shares (``checks``)."""
