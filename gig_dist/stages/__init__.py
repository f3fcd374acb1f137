"""Pipeline stages, one module each; :mod:`gig_dist.stages.registry` lists them in data-flow order.

Below the stages: :mod:`~gig_dist.stages.base` (what a stage is), and the helpers they share
(:mod:`~gig_dist.stages.forward`, :mod:`~gig_dist.stages.coding`, :mod:`~gig_dist.stages.pairs`);
no stage imports another. Above them: the registry, then :mod:`~gig_dist.stages.driver` (a
stage's lifecycle, which the runtimes call)."""
