"""Islands scored against people: the measures of the BSDS500 benchmark (Arbelaez, Maire, Fowlkes,
Malik, TPAMI 2011) for k-means islands of each level, the part-whole nesting of islands across
levels, and a parse-tree figure. The library behind ``apm segment`` (no argument parsing).

- ``measures``: covering, PRI, VI, ARI from contingency tables; ODS/OIS.
- ``truth``: ground truth read, cropped and scored (``Truth.score``, the one scoring path).
- ``islands``: k-means maps of a level's features, chance partitions, patch colours, features at
  any grid.
- ``tree``: nesting of islands across levels and the parse-tree figure.
- ``boundaries``: the benchmark's boundary measure (thinning, one-to-one matching, ODS/OIS/AP).
- ``ucm``: gPb-owt-ucm's ``ucm2`` maps as segmentations and boundary strength.
- ``run``: the benchmark run (``Plan``, ``score_image``, ``run``, summary, tables, JSON).
"""

from apm.segment.islands import (  # noqa: F401
    kmeans_maps, patch_colours, random_maps, score_maps, student_features, upsample_features)
from apm.segment.measures import (  # noqa: F401
    HIGHER_IS_BETTER, MEASURES, VI_BASE, ari_of, compact, contingency, covering_of, mean_scores, ods_ois,
    rand_of, scores_of, vi_of)
from apm.segment.run import (  # noqa: F401
    Plan, draw_trees, format_tables, image_features, load_photos, make_plan, nested_pairs, run, score_image,
    summarize, to_json, tree_levels)
from apm.segment.tree import island_colours, nesting, on_one_grid, parse_tree_figure, tree_edges  # noqa: F401
from apm.segment.truth import (  # noqa: F401
    BadGroundTruth, Truth, ari, cell_counts, check_map, covering, crop_truth, find_truth, load_truth,
    match_truth, pri, read_mat, read_png, read_truth, region_scores, upsample_labels, vi)
