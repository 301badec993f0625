/* fastopt: fused in-place optimizer updates. Public C99 API (filled in by the C-backend issue). */
#ifndef FASTOPT_H
#define FASTOPT_H
#ifdef __cplusplus
extern "C" {
#endif

/* Library version as "MAJOR.MINOR.PATCH"; a static string, never NULL. */
const char *fastopt_version(void);

#ifdef __cplusplus
}
#endif
#endif /* FASTOPT_H */
