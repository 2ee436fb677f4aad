"""Training nodeflow's own small demo model (see ``nodeflow.train.demo``)."""
