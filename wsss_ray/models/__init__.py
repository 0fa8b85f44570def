"""nn.Modules for every method. No Ray, no DeepSpeed, no device code: parallelism and precision
are applied from outside by wsss_ray.train."""
