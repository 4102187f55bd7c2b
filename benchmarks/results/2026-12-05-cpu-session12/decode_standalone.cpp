// The CPU decode kernel alone (no Python, no torch): 8 heads, D 64, fp32, 2 threads, caches of S keys read in turn
// (nset of them: 4 x 33.5 MB at S 8192 are read from memory). Build from the repository root, see README.md.
// Prints the minimum and median per call of 200 calls and the GB/s of K and V at the minimum.
#include "decode_kernel.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cstring>
using namespace fastattn::cpu;
int main(int argc, char** argv){
  int S = argc>1? atoi(argv[1]) : 8192; int nset = argc>2? atoi(argv[2]) : 4; int H=8, D=64;
  std::vector<float*> K(nset), V(nset); std::vector<float> q(H*D), out(H*D), lse(H);
  for(int i=0;i<nset;i++){ K[i]=(float*)aligned_alloc(64,(size_t)H*S*D*4); V[i]=(float*)aligned_alloc(64,(size_t)H*S*D*4);
    for(size_t j=0;j<(size_t)H*S*D;j++){K[i][j]=((j*7)%97)*0.001f; V[i][j]=(j%89)*0.01f;}}
  for(int e=0;e<H*D;e++) q[e]=0.01f*(e%13);
  std::vector<double> ts;
  for(int it=0;it<200;it++){
    DecodeArgs a; a.B=1; a.H=H; a.Hk=H; a.L=1; a.S=S; a.E=D; a.Ev=D; a.scale=0.125; a.causal=false; a.num_threads=2;
    auto view=[&](const float* p, int64_t s2){ AttnView v; v.data=p; v.stride[0]=(int64_t)H*s2*D; v.stride[1]=s2*D; v.stride[2]=D; v.stride[3]=1; return v; };
    a.q=view(q.data(),1); a.k=view(K[it%nset],S); a.v=view(V[it%nset],S); a.out=out.data(); a.lse=lse.data();
    auto t0=std::chrono::steady_clock::now(); decode_attention(a); auto t1=std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double,std::milli>(t1-t0).count());
  }
  std::sort(ts.begin(),ts.end());
  printf("S %d nset %d: min %.3f med %.3f ms (%.1f GB/s at min)  out0 %g\n", S, nset, ts[0], ts[100], 2.0*H*S*D*4/ts[0]/1e6, out[0]);
}
