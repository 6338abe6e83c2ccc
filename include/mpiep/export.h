// Symbols of the core that the torch op layer (mpiep._ops, a separate shared object) calls:
// the core is built with hidden visibility, so the runtime classes are exported explicitly.
#pragma once

#define MPIEP_API __attribute__((visibility("default")))
