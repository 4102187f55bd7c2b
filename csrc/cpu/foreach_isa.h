// Compiles one width-generic body once per x86 ISA: includes FA_ISA_INCLUDE (a "*-inl.h" file written against
// Vec, vec_traits.h) in namespace avx2 for AVX2/FMA/F16C (Vec: 8 lanes) and in namespace avx512 for AVX-512F
// (Vec: 16 lanes), Highway's per-target re-inclusion by hand. Use, inside namespace fastattn::cpu::{anonymous}:
//   #define FA_ISA_INCLUDE "name-inl.h"
//   #include "foreach_isa.h"
// Each copy is compiled for its own target only, so the AVX2 copy holds no EVEX code and runs on AVX2-only CPUs.
// Why not one template on the width: GCC takes a function's target options from its definition, not from the
// instantiation, so a template shared by both would need avx512f on its definition, and its AVX2 instantiations
// could then use EVEX encodings (xmm16-31, zmm spills) that fault on AVX2-only CPUs. The copies have internal
// linkage (anonymous namespace), so the linker never folds one compiled for one ISA into a caller of another.
// No include guard: included once per body.
#ifdef FA_X86
namespace avx2 {
FA_AVX2_BEGIN
#include FA_ISA_INCLUDE
FA_TARGET_END
}  // namespace avx2

namespace avx512 {
FA_AVX512_BEGIN
#include FA_ISA_INCLUDE
FA_TARGET_END
}  // namespace avx512
#endif
#undef FA_ISA_INCLUDE
