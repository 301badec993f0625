/* The avx512 CPU path: see isa_unit.inc; flags in CMakeLists.txt. */
#define FO_ISA avx512
#include "isa_unit.inc"
