// Undo msl_shim.h's address-space macros before the driver's main().
#undef device
#undef constant
#undef thread
#undef threadgroup
