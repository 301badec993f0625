#include "fastopt.h"

const char *fastopt_version(void) { return "0.1.0"; }
