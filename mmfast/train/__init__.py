"""Everything that makes the zoo and the tests, kept out of the runtime: ``import mmfast`` and ``pipeline()`` never
import this package (a test checks ``sys.modules``).

* :mod:`.data`: the synthetic scenes, clips and questions tiny-vlm learns and is evaluated on;
* :mod:`.evaluate`: held-out accuracy of a VLM pipeline on them (``mmfast zoo eval``, the quality benchmarks);
* :mod:`.tiny_vlm`, :mod:`.tiny_vlm_flex`, :mod:`.tiny_ar`, :mod:`.tiny_ar_drafter`, :mod:`.digit_classifier`: the
  resumable training recipes of the shipped checkpoints (``mmfast zoo train NAME``);
* :mod:`.tiny_models`: random-initialised tiny models of the real transformers families (tests, speed benchmarks);
* :mod:`.toy`: an enumerable toy AR generator, the oracle of the exact-distribution tests;
* :mod:`.examples`: the held-out examples ``make demo`` prints.
"""
