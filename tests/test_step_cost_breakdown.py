"""experiments/step_cost_breakdown.py's HLO accounting on a hand-written module (no compile)."""
from experiments import step_cost_breakdown as scb

# An optimized-HLO-like module: a fusion that only gathers rows from its first operand, a
# matmul fusion, an async copy of a parameter-shaped f32 array and a collective.
_OPT = """HloModule m, is_scheduled=true

%fused_gather (param_0: f32[100,8], param_1: s32[4]) -> f32[4,8] {
  %param_0 = f32[100,8]{1,0} parameter(0)
  %param_1 = s32[4]{0} parameter(1)
  ROOT %gather.1 = f32[4,8]{1,0} gather(%param_0, %param_1), offset_dims={1}, metadata={op_name="jit(train_step)/jvp(SconeLM)/SconeLM.embed_inputs/fgram_model/jit(_take)/gather"}
}

%fused_mm (param_0.1: bf16[4,8], param_1.1: bf16[8,16]) -> bf16[4,16] {
  %param_0.1 = bf16[4,8]{1,0} parameter(0)
  %param_1.1 = bf16[8,16]{1,0} parameter(1)
  ROOT %convolution.1 = bf16[4,16]{1,0} convolution(%param_0.1, %param_1.1), dim_labels=bf_io->bf
}

ENTRY %main (p0: f32[100,8], p1: s32[4], p2: bf16[4,8], p3: bf16[8,16], p4: f32[8,16]) -> bf16[4,16] {
  %p0 = f32[100,8]{1,0} parameter(0)
  %p1 = s32[4]{0} parameter(1)
  %p2 = bf16[4,8]{1,0} parameter(2)
  %p3 = bf16[8,16]{1,0} parameter(3)
  %p4 = f32[8,16]{1,0} parameter(4)
  %fusion.1 = f32[4,8]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_gather, metadata={op_name="jit(train_step)/jvp(SconeLM)/SconeLM.embed_inputs/fgram_model/jit(_take)/gather"}
  %copy-start.1 = (f32[8,16]{1,0:S(1)}, f32[8,16]{1,0}, u32[]) copy-start(%p4)
  %copy-done.1 = f32[8,16]{1,0:S(1)} copy-done(%copy-start.1)
  %all-reduce.1 = f32[4,8]{1,0} all-reduce(%fusion.1), replica_groups={}, to_apply=%add
  ROOT %fusion.2 = bf16[4,16]{1,0} fusion(%p2, %p3), kind=kOutput, calls=%fused_mm, metadata={op_name="jit(train_step)/jvp(SconeLM)/SconeLM.backbone/decoder/layers_0/mlp/wi/dot_general"}
}
"""

# The unoptimized program: FLOPs come from its dots.
_PRE = """HloModule pre

ENTRY main.1 {
  a = bf16[2,4,8]{2,1,0} parameter(0)
  b = bf16[8,16]{1,0} parameter(1)
  ROOT dot.1 = bf16[2,4,16]{2,1,0} dot(a, b), lhs_contracting_dims={2}, rhs_contracting_dims={0}, metadata={op_name="jvp(SconeLM)/SconeLM.embed_inputs/fgram_model/layers_0/mlp/wi/dot_general"}
}
"""


def test_bytes_by_instruction_part_and_kind():
  prog = scb.Program(_OPT, frozenset({(8, 16)}))
  rows = {r[4] if r[4] != 'fusion' else r[1]: r for r in prog.rows}
  # The gather fusion reads only the 4 gathered rows of p0 (4*8*4 B), the indices (16 B) and
  # writes 4*8*4 B: not the whole 100-row table.
  assert rows['gather'][5] == 4 * 8 * 4 + 4 * 4 + 4 * 8 * 4
  assert rows['gather'][0] == 'fgram_model'
  assert rows['matmul'][5] == (4 * 8 + 8 * 16 + 4 * 16) * 2
  assert rows['matmul'][0] == 'main_blocks'
  # The async copy moves a parameter-shaped f32 array once each way; the done adds nothing.
  assert rows['copy-start'][1] == 'async_copy_weights'
  assert rows['copy-start'][5] == 2 * 8 * 16 * 4
  assert rows['copy-done'][5] == 0
  assert prog.weight_moves == {'step_input': 2 * 8 * 16 * 4}
  assert rows['all-reduce'][0] == 'collectives'


def test_flops_of_dots():
  pre = scb.Program(_PRE)
  (row,) = [r for r in pre.rows if r[6]]
  assert row[6] == 2 * (2 * 4 * 16) * 8
  assert row[0] == 'fgram_model'
