"""Examples that run gig-dist on real models and real photos, offline (``pip install -e ".[examples]"``)."""
