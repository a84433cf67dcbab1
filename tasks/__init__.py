"""SeqIO task and mixture registrations, kept in the repository's tasks/ and installed as
`specialize_jax.tasks`. Importing this package registers them all (a side effect only the command
line, the T5X gin files and tests cause; the library layers never import it). docs/data.md lists
the names.

- `tasks.math_eval`: `{gsm8k_test,gsm8k_dev,multiarith_dev,multiarith_test,asdiv_test,svamp_test,
  addsub_test,singleeq_test,gsm8k_tfds_test}_{zs_ao,zs_cot,icl_ao,icl_cot}`; gin/t5x/ registers
  the mixture `t5x_dev_eval` of its EVAL_TASKS through `math_eval.register_eval_mixture`
- `tasks.bbh`: `bbh_{task}_{cot,ao,ao_paper}` for the 27 BBH tasks, mixtures `bbh_cot`, `bbh_ao`,
  `bbh_ao_paper` (`ao_paper`: the original's answer-only prompt)
- `tasks.distillation`: `gsm8k_distill_{format}` and the mixture `gsm8k_distill`
- `tasks.demo`: `demo_train_{cot,ao}`, `demo_{id,ood,long}_{cot,ao}` (the generated CPU demo)
- `tasks.world`: the demo's world (`specialize demo`): `world_pretrain`, `world_instruct`,
  `world_teacher_train`, `world_distill[_top6][_zs]`, `world_{family}_{dev,test}_{format}`,
  `world_bbh_{task}_{dev,test}_{format}`
"""
from specialize_jax.tasks import bbh
from specialize_jax.tasks import demo
from specialize_jax.tasks import distillation
from specialize_jax.tasks import math_eval
from specialize_jax.tasks import world

math_eval.register()
bbh.register()
distillation.register()
demo.register()
world.register()
