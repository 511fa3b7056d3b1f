from ansimi.cli import main

main()
