/* The baseline CPU path: see isa_unit.inc; flags in CMakeLists.txt. */
#define FO_ISA baseline
#include "isa_unit.inc"
