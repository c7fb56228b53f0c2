import jax
import jax.numpy as jnp

from flaxformer_lite import op_profile


def test_a_profile_names_the_matmul_and_the_loop_of_a_program_and_sums_by_kind():
    def program(a, b):
        def body(i, x):
            return jnp.tanh(x @ b) + i
        return jax.lax.fori_loop(0, 3, body, a).sum()

    a = jnp.ones((256, 256)) / 256
    b = jnp.eye(256)
    jitted = jax.jit(program)
    hlo = jitted.lower(a, b).compile().as_text()
    jitted(a, b).block_until_ready()
    rows = op_profile.profile(lambda: jitted(a, b), hlo, calls=2)
    kinds = {row.kind for row in rows}
    assert "matmul" in kinds and "loop" in kinds, rows
    matmul = next(row for row in rows if row.kind == "matmul")
    assert matmul.runs == 3 and matmul.shape == "f32[256,256]" and matmul.ms > 0, matmul  # Once per iteration.
    assert "dot_general" in matmul.source or "tanh" in matmul.source, matmul
    totals = op_profile.by_kind(rows)
    assert "loop" not in totals and abs(sum(totals.values()) - sum(r.ms for r in rows if r.kind != "loop")) < 1e-9
    text = op_profile.format_profile(rows, top=5, title="toy")
    assert text.startswith("toy: ") and matmul.name in text


def test_kinds_come_from_what_a_fusion_computes():
    hlo = """HloModule jit_f, entry_computation_layout={()->f32[]}

%fused_dot (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  ROOT %d = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_copy (q: f32[4,4]) -> f32[4,4] {
  %q = f32[4,4]{1,0} parameter(0)
  ROOT %t = f32[4,4]{0,1} transpose(%q), dimensions={1,0}
}

ENTRY %main (x: f32[4,4]) -> (f32[4,4], f32[4,4]) {
  %x = f32[4,4]{1,0} parameter(0)
  %ynn_fusion = f32[4,4]{1,0} fusion(%x), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(f)/jvp(M)/dot_general"}
  %copy_fusion = f32[4,4]{0,1} fusion(%ynn_fusion), kind=kLoop, calls=%fused_copy
  %exp = f32[4,4]{1,0} exponential(%x), metadata={op_name="jit(f)/transpose(jvp(M))/exp"}
  %topk = (f32[4,2]{1,0}, s32[4,2]{1,0}) custom-call(%exp), custom_call_target="TopK"
  ROOT %w = (f32[4,4]{1,0}, /*index=1*/f32[4,4]{0,1}) tuple(%exp, %copy_fusion)
}
"""
    module, instructions, opcodes = op_profile.parse_hlo(hlo)
    assert module == "jit_f"
    kinds = {name: op_profile.kind_of(instructions[name], opcodes)
             for name in ("ynn_fusion", "copy_fusion", "exp", "topk")}
    assert kinds == {"ynn_fusion": "matmul", "copy_fusion": "copy/transpose", "exp": "elementwise",
                     "topk": "custom-call"}
    assert instructions["w"].shape == "(f32[4,4], f32[4,4])" and instructions["w"].opcode == "tuple"
    assert instructions["topk"].shape == "(f32[4,2], s32[4,2])"
    assert op_profile.shorten(instructions["ynn_fusion"].source) == "fwd M/dot_general"
    assert op_profile.shorten(instructions["exp"].source) == "bwd M/exp"
