"""``gig-dist report``: a static site of a run, opened from disk with no server and no network.

    index.html                      the run: config, images, per tap K / R^2 / l0, per pair
                                    completeness and kept fraction, timings, plots; tap and
                                    class links
    tap/<tap>/p<N>.html             concepts of a tap sorted by importance, ``PAGE`` a page
    concept/<tap>/<k>.html          members on their images, split-tree neighbours, top GIG
                                    sources and targets, the classes it drives, purity (toy)
    class/<c>.html                  the class's concept graph, drawn by Graphviz ``dot`` when it
                                    is installed (nodes are thumbnails linking to concept pages),
                                    else by a layered layout of gig-dist's own (the page says which)
    img/...                         PNG thumbnails, member strips and plots beside the pages

``build`` reads the run (a tap's concepts a block at a time, each concept's own members), ``pages``
renders the Jinja2 templates in ``templates/``, ``figures`` draws. Whatever stage is missing is
named on the page that would show it; the rest is built.
"""

from gig_dist.report.build import Report, ReportSummary, build_report, part_recall

__all__ = ["Report", "ReportSummary", "build_report", "part_recall"]
