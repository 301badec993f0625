/* The avx2 CPU path: see isa_unit.inc; flags in CMakeLists.txt. */
#define FO_ISA avx2
#include "isa_unit.inc"
