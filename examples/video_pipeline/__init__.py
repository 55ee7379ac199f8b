"""Video pipeline: five stages as worker groups, a stage killed mid-way, each video once."""
